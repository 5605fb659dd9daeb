"""The composition root: the ``tether`` command line and the process roles it runs.

The only package that imports the gateway, the worker and the scheduler together.
"""
