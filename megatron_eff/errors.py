"""`RunError`: a run failed for a reason its user can act on, and the message says which.

Raised where a run meets the outside world after its flags were checked: a checkpoint that is corrupt, holds
another model or non-finite values, a full disk, a process group that timed out, too many non-finite steps in
a row. `pretrain.py` prints it as one `pretrain.py: error: ...` line and exits 2, without a traceback; bugs
keep theirs. A leaf module: it imports nothing.
"""


class RunError(RuntimeError):
    """A user-facing run failure; the message names the file, flag or rank concerned."""
