#!/bin/bash
# The ablation grid's decisive comparisons (loss kind, l 8 vs 16, k 100 vs 1000) at the demo's budget (1,050 x 256
# on 2 ranks), 3 seeds, each kind tuned alike (lr 1e-3 vs 3e-3 at margin 0.3). Resumable: finished runs are in
# bench/results/ablation_5x_runs.json, so a fresh checkout skips them. ~15 min per run on 2 quiet cores (14 min
# training, under 1 min probing).
# Then `python bench/ablation_budget.py` sets each claim's verdict beside the 200-step grid's (ablation_budget.md).
# Extra arguments are passed on: `bash bench/ablate_5x.sh ablate.report_only=true` rebuilds the report from the ledger.
cd "$(dirname "$0")/.."
exec nice -n 19 .venv/bin/python -m runners.ablate ablate.nproc=2 ablate.run_dir=runs/ablate_5x ablate.name=ablation_5x \
  ablate.cluster_dir=data/ablate \
  "ablate.train=[train.total_steps=1050,train.global_batch_size=256,optim.warmup_steps=50,train.ckpt_every=175,train.log_every=50,train.progress_bar=false,logging.wandb.mode=disabled]" \
  "ablate.tune.lr=[1.0e-3,3.0e-3]" "ablate.tune.margin=[0.3]" \
  "ablate.tune.monitor=[monitor.every=1050,monitor.queries=train,monitor.train_size=10000,monitor.test_size=5000]" \
  "ablate.only_groups=[loss,l,k]" "ablate.groups.l=[{l: 8},{l: 16}]" "ablate.groups.k=[{k: 100},{k: 1000}]" "$@"
