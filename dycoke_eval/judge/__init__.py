"""GPT judging for ActivityNet-QA and VideoDC, separable from generation (`python -m dycoke_eval.judge DIR`)."""
