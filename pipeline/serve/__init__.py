"""``fusioner serve``: a web page over one trained run, where anyone uploads a photo, types class names
and sees the masks. The page's predictions are those of ``fusioner predict`` (the same
:class:`pipeline.eval.predict.Predictor`), byte for byte. Needs the ``serve`` extra (starlette, uvicorn).
"""
