"""What the tests share: the tolerances and assertions (asserts.py), a small model and its data
(models.py), the bucket-op cases and builders (op_cases.py), the distributed runs' model and data
(ddp_cases.py). tests/reference/ holds the independent loops the optimizers are checked against."""
