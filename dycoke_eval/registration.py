"""lmms-eval discovers our model through the `lmms_eval.models` entry-point group (pyproject.toml)."""

from lmms_eval.models.registry_v2 import ModelManifest

MODEL_ID = "llava_onevision_compressed"


def lmms_eval_models() -> list[ModelManifest]:
    return [ModelManifest(model_id=MODEL_ID, simple_class_path="dycoke_eval.wrapper.CompressedVideoLM")]
