from tests.train.conftest import REPO, SMALL, TINY, _single_process_env, run_lsp  # noqa: F401  (autouse fixture)
