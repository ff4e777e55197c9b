"""Wire types of nsam (package `nsam.v1`): generated from `nsam.proto` by `python protos/generate.py`."""
