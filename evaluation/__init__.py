"""Evaluation of the engines against real target-kernel series: `ltdiff-node evaluate` and
`ltdiff-node bars`.

`evaluate` needs the `evaluate` extra (pyradiomics, SimpleITK, matplotlib), which the node does
not: `evaluation.extra` says what is missing. This package file, `extra`, `labels` and `bars`
import none of the three, so `bars` runs on a node installed without the extra.

Series pairing (`training.pairs`) is shared with training and stays there: evaluation imports
from training, never the reverse, and pairing by tags defines the data both work on.
"""
