"""One exception tree for all of tortie.

Entry points map it to exit codes (tortiectl, tortie-lab) and to CNI error codes
(the CNI server); nothing below an entry point calls sys.exit.

    TortieError                      exit 1, CNI 999
    ├── ValidationError              a resource or request is malformed; names the field (CNI 7)
    ├── NotFound                     a resource, handle or address that does not exist
    ├── AlreadyExists                create of something that is there
    ├── Conflict                     compare-and-swap retries exhausted
    ├── DatastoreUnavailable         etcd cannot be reached (CNI 11, try again later)
    ├── IPAMError                    address management failure
    │   └── PoolExhausted            no free address in any usable pool
    └── DataplaneError               the kernel refused a change (netlink, nftables)
"""

from __future__ import annotations


class TortieError(Exception):
    exit_code = 1
    cni_code = 999  # CNI spec: 100+ are plugin-specific; 999 is "generic" in practice

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        if self.field and not self.message.startswith(self.field):
            return f"{self.field}: {self.message}"
        return self.message


class ValidationError(TortieError):
    exit_code = 2
    cni_code = 7  # CNI: invalid network config


class NotFound(TortieError):
    exit_code = 3


class AlreadyExists(TortieError):
    exit_code = 4


class Conflict(TortieError):
    exit_code = 5


class DatastoreUnavailable(TortieError):
    exit_code = 6
    cni_code = 11  # CNI: try again later


class IPAMError(TortieError):
    cni_code = 999


class PoolExhausted(IPAMError):
    pass


class DataplaneError(TortieError):
    pass
