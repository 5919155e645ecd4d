"""A local web page for a trained tokenizer + MaskGIT pair: sample, guide, inpaint and outpaint.

    python -m studio --run runs/demo            # RUN/tokenizer/checkpoint.pt + RUN/maskgit/checkpoint.pt
    python -m studio --tokenizer a.pt --maskgit b.pt --port 8080

api.py     the JSON requests, checked where they enter
engine.py  the models behind a lock: generate, edit, the per-step strip
server.py  the standard library's HTTP server: the page, the API, JSON errors
static/    the page itself (plain HTML, CSS and JavaScript; nothing loaded from elsewhere)
"""
