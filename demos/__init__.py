"""The rwkv_mm demo app (`python -m demos.app`): Chat, Search and Classify tabs in one Gradio page.

Importing this package turns Gradio's analytics off before anything imports gradio.
"""

import os

# before any `import gradio`: otherwise gradio phones home (analytics and a version check)
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
