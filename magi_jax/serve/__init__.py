"""The streaming web app for sampling (`python -m experiments.serve`, experiments/serve.py).

`load_server(c)` loads the components of a sampling config once (server.py); `build_page`
(page.py) is the Gradio page whose requests (form.py: the page's fields -> a checked request)
run one at a time on a worker thread (job.py), the video growing in the page chunk by chunk
(preview.py) with each chunk's time in the status line (status.py). Gradio is imported only
by page.py (the `serve` extra: pip install -e '.[serve]').
"""

from magi_jax.serve.errors import FormError, ServeError
from magi_jax.serve.form import Form, Prepared, prepare
from magi_jax.serve.server import Server, Update, load_server

__all__ = ["Form", "FormError", "Prepared", "ServeError", "Server", "Update", "load_server",
           "prepare"]
