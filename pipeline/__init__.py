"""Generation pipeline: everything below the UI border. Never imports gradio; imports torch and
lightx2v only lazily, inside the LightX2V backend and the GPU helpers."""
