"""selfreward: Self-Rewarding Language Model training as a Kubernetes resource.

The package is laid out by job:

- ``spec``        the run spec model (source of the CRD schema)
- ``layout``      artifact paths and the ordered steps of a run
- ``storage``     one abstraction over file:// and s3:// artifact stores
- ``worker``      ``selfreward worker <phase>``: sft, instruct, generate, judge, pairs, train
- ``local``       ``selfreward run``: the phases as local processes
- ``reconcile``   the operator's pure reconcile function
- ``controller``  the thin kopf adapter around it
"""
__version__ = "0.1.0"
