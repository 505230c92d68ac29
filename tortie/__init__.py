"""tortie: a Calico-style networking agent for Kubernetes.

Kept import-free: the CNI shim path must not pay for anything here.
"""

__version__ = "0.1.0"
