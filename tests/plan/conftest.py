"""The planner's tests share the CLI helpers and the single-process environment of tests/train."""
from tests.train.conftest import REPO, _single_process_env, run_lsp  # noqa: F401 (the autouse fixture applies here)
