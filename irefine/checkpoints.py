"""``irefine checkpoints resign``: sign checkpoints written before checkpoints were signed.

A checkpoint can hold a pickle, so ``resume`` loads only checkpoints signed under this
deployment's key (``engine.signing``). Signing an old one tells every worker it may load it:
the command lists what it would sign and asks first (``--yes`` skips the question).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from irefine.errors import EXIT_FAILED, EXIT_OK, BadInput

JOB_LIST_LIMIT = 1_000_000_000


def use_deployment_key() -> None:
    """Sign and verify in this process with the key the flow runs use (a Secret block if named)."""
    from engine.settings import load_settings

    block = load_settings().secret_key_block  # a SpecError here is exit code 2 (irefine.cli.main)
    if block:
        from engine.signing import use_secret_key
        from flows.secret_key import secret_key_from_block

        use_secret_key(secret_key_from_block(block))


def cmd_resign(args: argparse.Namespace) -> int:
    from engine.signing import checkpoint_problem, secret_key, sign_checkpoint

    if bool(args.job_ids) == bool(args.all):
        raise BadInput("name the jobs to re-sign (irefine checkpoints resign JOB_ID ...) or give --all")
    from engine.settings import load_settings
    from engine.store import JobStore

    use_deployment_key()
    store = JobStore.from_settings(load_settings())
    try:
        key = secret_key()
        job_ids = args.job_ids or [r.job_id for r in store.list_jobs(JOB_LIST_LIMIT, fresh=True)]
        for job_id in args.job_ids:
            store.get_job(job_id, fresh=True)  # an unknown id is exit code 2, before any question
        todo: list[tuple[str, Any]] = []
        for job_id in job_ids:
            checkpoint = store.last_checkpoint(job_id)
            if checkpoint is None:
                continue
            problem = checkpoint_problem(job_id, checkpoint.state, key)
            if problem is not None:
                print(f"job {job_id}: checkpoint of cycle {checkpoint.cycle} {problem}")
                todo.append(checkpoint)
        if not todo:
            print("every checkpoint is signed: nothing to do")
            return EXIT_OK
        if not args.yes and not _confirm(len(todo)):
            print("nothing re-signed")
            return EXIT_FAILED
        signed = 0
        for checkpoint in todo:
            state = sign_checkpoint(checkpoint.job_id, checkpoint.state, key)
            if store.replace_checkpoint_state(checkpoint.job_id, checkpoint.cycle, state):
                signed += 1
            else:
                print(f"job {checkpoint.job_id}: it wrote a newer checkpoint meanwhile; left as is")
        print(f"re-signed {signed} checkpoint(s)")
        return EXIT_OK
    finally:
        store.close()


def _confirm(count: int) -> bool:
    question = (
        f"Re-sign {count} checkpoint(s)? Workers will then load them, pickles included: do it only if "
        "no one else can write this job store. [y/N] "
    )
    try:
        answer = input(question)
    except EOFError:  # no terminal to ask on: the answer is no
        print(file=sys.stderr)
        return False
    return answer.strip().lower() in ("y", "yes")


def add_parser(sub: Any) -> None:
    """Add ``checkpoints`` (with ``resign``) to the CLI's subcommands."""
    checkpoints = sub.add_parser("checkpoints", help="manage the signed checkpoints jobs resume from")
    commands = checkpoints.add_subparsers(dest="checkpoints_command", required=True, metavar="COMMAND")
    resign = commands.add_parser(
        "resign",
        help="sign checkpoints that are unsigned (written before signing) or signed under another key",
        description="Resume loads only checkpoints signed under this deployment's key (IRE_SECRET_KEY, "
        "the Secret block IRE_SECRET_KEY_BLOCK, or IRE_HOME/secret.key). This signs the named jobs' "
        "checkpoints (or all with --all) after listing them and asking. A checkpoint can hold a pickle, "
        "which runs code when loaded: re-sign only checkpoints of a store no one else can write. "
        "Exit codes: 0 done (or nothing to do), 1 declined, 2 bad input.",
    )
    resign.add_argument("job_ids", nargs="*", metavar="JOB_ID", help="jobs whose checkpoints to sign")
    resign.add_argument("--all", action="store_true", help="every job in the store")
    resign.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    resign.set_defaults(func=cmd_resign)
