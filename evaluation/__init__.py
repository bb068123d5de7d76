"""Evaluation of the engines against real target-kernel series: `ltdiff-node evaluate` and
`ltdiff-node bars`.

`evaluate` needs the `evaluate` extra (pyradiomics, SimpleITK, matplotlib), which the node does
not: `evaluation.extra` says what is missing. This package file, `extra`, `labels` and `bars`
import none of the three, so `bars` runs on a node installed without the extra.
"""
