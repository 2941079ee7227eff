"""bids_cadiff: a BIDS App segmenting brain structures from T1w MRI with CA-Diff."""

__version__ = "0.1.0"
CODE_URL = "https://github.com/bids-cadiff/bids_cadiff"
