"""The Calligrapher RL studio:  python app.py [--host 127.0.0.1] [--port 7860] [--auth USER:PASS] [--runs_dir DIR]

See docs/studio.md. The code is in the app/ package (server.py parses these flags and launches).
"""

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

if __name__ == "__main__":
    from app.server import main
    from calligrapher_rl.errors import cli_main

    cli_main(main)
