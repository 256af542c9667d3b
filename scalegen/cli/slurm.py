"""scalegen slurm submit RECIPE [key=value ...] --nodes N --gpus-per-node G [...]"""

from __future__ import annotations

import argparse
import sys

from scalegen.distributed.slurm import load_profile, render, submit

HELP = "submit a recipe to SLURM (sbatch script from cluster/sbatch.template + a cluster profile)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="slurm_command", metavar="ACTION", required=True)
    p = sub.add_parser(
        "submit",
        help="render the sbatch script, store it in the run folder, submit it",
        description="Render the sbatch script for RECIPE, store it in the run folder and submit "
        "it; prints the job id. One task per GPU, launched with srun; a preemption signal "
        "some minutes before the time limit checkpoints and requeues the job.",
    )
    p.add_argument("recipe", help="recipe name (vae/mnist) or path to a YAML file")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--nodes", type=int, required=True, help="number of nodes")
    p.add_argument(
        "--gpus-per-node", type=int, required=True, help="GPUs per node (one task each); 0 = CPU tasks"
    )
    p.add_argument(
        "--tasks-per-node",
        type=int,
        default=None,
        help="processes per node; default: one per GPU (1 when --gpus-per-node 0)",
    )
    p.add_argument("--partition", default=None, help="SLURM partition (default: the profile's)")
    p.add_argument("--time", default=None, help="time limit, e.g. 24:00:00 (default: the profile's)")
    p.add_argument("--account", default=None, help="SLURM account (default: the profile's)")
    p.add_argument(
        "--profile",
        default=None,
        help="cluster profile name in cluster/profiles/ or a path (default: $SCALEGEN_CLUSTER_PROFILE "
        "or 'default')",
    )
    p.add_argument("--job-name", default=None, help="job name (default: scalegen-RUN_NAME)")
    p.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")


def run(args: argparse.Namespace) -> int:

    sub = render(
        args.recipe,
        list(args.overrides),
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.tasks_per_node,
        partition=args.partition,
        time=args.time,
        account=args.account,
        profile=load_profile(args.profile),
        job_name=args.job_name,
    )
    if args.dry_run:
        print(sub.script, end="")
        return 0
    job_id, path = submit(sub)
    print(f"submitted {path}", file=sys.stderr)
    print(job_id)
    return 0
