"""lmms-eval discovers our model through the `lmms_eval.models` entry-point group (pyproject.toml)."""

MODEL_ID = "llava_onevision_compressed"


def lmms_eval_models() -> list:
    """The manifests lmms-eval's registry reads (imported here, so this module loads before lmms-eval without a cycle)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path="dycoke_eval.wrapper.CompressedVideoLM")]
