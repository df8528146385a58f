"""memfit inside the trainers people already use: Lightning (:mod:`memfit.integrations.lightning`) and the
Hugging Face Trainer (:mod:`memfit.integrations.transformers`).

Each is imported on its own, so that memfit never imports Lightning or transformers unless asked.
"""
