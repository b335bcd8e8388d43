"""Reference networks for measurement only: POSTER and POSTER++ (POSTER V2), random weights.

Written from the papers' descriptions and their published configurations (the released code read
for sizes, never copied), on the project's own IR-50 and MobileFaceNet blocks where the published
models use the same ones. They exist so that bench/compare_models.py can put FERMam's counts and
speed beside its two predecessors' on one machine; they are not product code and have no weights.
"""
