"""Foreign ONNX decoders (exported by someone else) as graphs tokenpass's passes rewrite.

``load.py`` reads a file with one-line errors; ``sites.py`` finds attention by what it computes;
``canonicalize.py`` turns every site into a ``tokenpass.Attention`` function call; ``interface.py`` maps
the file's inputs and outputs onto tokenpass's step interface; ``trace.py`` traces tokenpass's ONNX
translations into model-local functions. ``tokenpass.optimize_onnx`` puts them together.
"""
