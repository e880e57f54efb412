"""The studies: what the notebooks compute on top of the runner, each a few calls from a notebook cell.

`retrieval_eval` (notebook 01: answer recall@k of the retrievers, the fine-tuned dense encoder),
`budget` (answer recall per prompt token), `end_to_end` (notebook 07: what end-to-end training did to the
retriever, and the rows it compares), `analysis` (paired tests, power, oracle gap, error attribution, the
findings), `plots` (the figures).
"""
