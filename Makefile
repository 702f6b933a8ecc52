# kuda: `make demo` runs the main job on the embedded model, `make test` runs the test suite.
# Both install what they need first (a virtual environment in .venv).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first, pinned: on the build machines pip takes the CPU wheel lying on disk (seconds).
# GPU machines: make install TORCH='torch>=2.2' (or any CUDA build you already use).
TORCH ?= torch==2.13.0
# This machine's pip configuration warns about every local index it cannot use: hide that noise.
QUIET := 2> >(grep -v '^WARNING: Location' >&2)

.PHONY: install test demo lint clean-outputs table-facts ablation-kuda table-wmdp table-muse tune \
  table-tofu tune-stage1 tune-stage2 bench-unlearn table-domains frontier table-robustness

install: $(VENV)/.installed

# uv resolves and installs the rest about 2.5x faster than pip (67 s vs 163 s here); it keeps
# the torch already installed, which satisfies the project's range. pip is the fallback.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH)" uv $(QUIET)
	$(BIN)/uv pip install -q --python $(BIN)/python -e '.[dev]' \
	  || $(BIN)/pip install -q --disable-pip-version-check -e '.[dev]' $(QUIET)
	touch $@

# The suite runs in as many processes as there are cores (pytest-xdist), one torch thread each:
# its tests are small and single-threaded work does not gain from a second thread.
test: install
	OMP_NUM_THREADS=1 $(BIN)/pytest -q -n auto

demo: install
	$(BIN)/kuda unlearn name=demo locate.samples=3

lint: install
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

# docs/config.md, the reference of every config group, option and key, generated from the schemas
# and conf/; tests/test_config_reference.py fails while it is out of date.
.PHONY: docs-config
docs-config: install
	$(BIN)/python scripts/config_reference.py

clean-outputs:
	rm -rf outputs

# ----------------------------------------------------------------------------- paper tables, tuning
# Sequences of kuda commands (docs/scale.md). DRY=1 prints them instead of running them. Each
# command is a sweep with a fixed hydra.sweep.dir: run the target again after an interruption
# and completed jobs are skipped. A sweep whose jobs partly failed exits 1; the sequence goes on
# (the report lists failed runs, the picker ignores them); bad input (exit 2) stops it.
KUDA ?= $(BIN)/kuda
RUN := $(if $(DRY),@echo,)
DEPS := $(if $(DRY),,install)
SWEEP_OK := || [ $$? -eq 1 ]
TABLES ?= outputs/tables
ARGS ?=
# unlearn options of the baselines; rmu_zephyr is the published 7B setting (unlearn=rmu is sized
# for the embedded SmolLM2-135M)
BASELINES ?= rmu_zephyr,npo,simnpo,ga

# The facts table on the embedded SmolLM2-135M (CPU, about 75 minutes on 2 cores): trace once,
# unlearn chemistry with every method (their defaults are tuned for this model and data,
# docs/baselines.md), report. The table: $(TABLES)/facts/report/report.md.
FACTS_METHODS ?= ga,graddiff,npo,simnpo,rmu,adaptive_rmu,undial,idkdpo,task_vector,whp,elm,kuda
FACTS_COLUMNS := facts.forget.mc_acc facts.floor.mc_acc summary.forget_removed_mc \
  facts.forget.gen_acc facts.floor.gen_acc summary.forget_removed_gen facts.retain.mc_acc \
  facts.retain.other_subjects.token_agreement facts.retain.agreement facts.retain.token_agreement \
  fluency.forget.nll_vs_fluent_wrong summary.fluency_entropy_ratio fluency.forget.repetition \
  perplexity.perplexity diagnostics.krd.mean train.seconds
comma := ,
empty :=
space := $(empty) $(empty)
table-facts: $(DEPS)
	$(RUN) $(KUDA) trace -m $(ARGS) hydra.sweep.dir=$(TABLES)/facts/trace
	$(RUN) $(KUDA) unlearn -m unlearn=$(FACTS_METHODS) locate.from_run=$(TABLES)/facts/trace/0 \
	  $(ARGS) hydra.sweep.dir=$(TABLES)/facts/runs $(SWEEP_OK)
	$(RUN) rm -rf $(TABLES)/facts/report
	$(RUN) $(KUDA) report report.runs=[$(TABLES)/facts/runs] report.columns=[$(subst $(space),$(comma),$(strip $(FACTS_COLUMNS)))] \
	  hydra.run.dir=$(TABLES)/facts/report

# Every shipped domain forgotten in turn, the others retained (docs/results_facts.md).
# One trace per domain (3 noise samples, as the demo), shared by table-domains and frontier; the
# starting model's evaluation (with the domain's never-learned floor) is cached per domain.
# DOMAINS=chemistry,capitals picks some. Tables: $(TABLES)/domains/report/report.md and
# $(TABLES)/frontier/report/{frontier.md,frontier_DOMAIN.png}.
ALL_DOMAINS := chemistry capitals languages landmarks occupations
DOMAINS ?= $(subst $(space),$(comma),$(ALL_DOMAINS))
DOMAIN_METHODS ?= kuda,rmu,npo,simnpo,ga,undial,whp,task_vector,elm
DOMAIN_SAMPLES ?= 3
DOMAIN_COLUMNS := facts.forget.mc_acc facts.floor.mc_acc facts.floor.chance facts.floor.surface \
  summary.forget_removed_mc facts.forget.gen_acc facts.floor.gen_acc summary.forget_removed_gen \
  facts.retain.other_subjects.mc_acc facts.retain.other_subjects.token_agreement \
  facts.retain.same_subjects.mc_acc facts.retain.same_subjects.token_agreement \
  summary.perplexity_ratio fluency.forget.nll_vs_fluent_wrong summary.fluency_entropy_ratio \
  fluency.forget.repetition train.seconds
domain_list = $(subst $(comma),$(space),$(DOMAINS))
domain_args = 'data.forget_domains=[$(1)]' data.retain_domains=null
define newline


endef
define trace_domain
$(RUN) $(KUDA) trace -m locate.samples=$(DOMAIN_SAMPLES) $(call domain_args,$(1)) $(ARGS) \
  hydra.sweep.dir=$(TABLES)/domains/$(1)/trace
endef
table-domains: $(DEPS)
	$(foreach d,$(domain_list),$(call trace_domain,$(d))$(newline)$(call domain_defaults,$(d))$(newline))
	$(RUN) rm -rf $(TABLES)/domains/report
	$(RUN) $(KUDA) report report.runs=[$(TABLES)/domains] \
	  report.columns=[$(subst $(space),$(comma),$(strip $(DOMAIN_COLUMNS)))] \
	  hydra.run.dir=$(TABLES)/domains/report

# Trade-off curves: every method of FRONTIER_METHODS swept over its learning rate (from "nothing
# forgotten" to "damaged", with points between 0.5 and 0.9 forgotten) on each of DOMAINS. Forget
# removed against damage (perplexity ratio, 1 - other-subject token agreement), one PNG per
# domain, and which method is lower at matched forget-removed levels (0.5-0.9), with a bootstrap
# over facts. The default learning rates are table-domains' runs (run here when missing, skipped
# when done); the other sweeps skip the retain greedy answers (token agreement needs only the
# starting model's). FRONTIER_METHODS is a comma list, as DOMAIN_METHODS and DOMAINS are.
FRONTIER_METHODS ?= kuda,rmu,npo,simnpo,ga,undial,whp,task_vector,elm
FRONTIER_LR_kuda ?= 1e-3,3e-3,4.5e-3,6e-3,8e-3,1e-2,2e-2
FRONTIER_LR_rmu ?= 3e-4,5e-4,7e-4,1e-3,2e-3,3e-3
FRONTIER_LR_npo ?= 3e-5,1e-4,2e-4,3e-4,6e-4,1e-3
FRONTIER_LR_simnpo ?= 1e-4,3e-4,1e-3,3e-3
FRONTIER_LR_ga ?= 1e-5,2e-5,3e-5,4e-5,6e-5
FRONTIER_LR_undial ?= 3e-5,1e-4,2e-4,3e-4,6e-4
FRONTIER_LR_whp ?= 1e-5,3e-5,1e-4,3e-4
FRONTIER_LR_task_vector ?= 1e-5,3e-5,1e-4,3e-4
FRONTIER_LR_elm ?= 3e-4,1e-3,3e-3,1e-2
define domain_defaults
$(RUN) $(KUDA) unlearn -m unlearn=$(DOMAIN_METHODS) locate.from_run=$(TABLES)/domains/$(1)/trace/0 \
  $(call domain_args,$(1)) $(ARGS) hydra.sweep.dir=$(TABLES)/domains/$(1)/runs $(SWEEP_OK)
endef
define frontier_domain
$(call trace_domain,$(1))
$(call domain_defaults,$(1))
$(foreach m,$(subst $(comma),$(space),$(FRONTIER_METHODS)),$(RUN) $(KUDA) unlearn -m unlearn=$(m) \
  unlearn.lr=$(FRONTIER_LR_$(m)) locate.from_run=$(TABLES)/domains/$(1)/trace/0 \
  eval.facts.retain_greedy=false $(call domain_args,$(1)) $(ARGS) \
  hydra.sweep.dir=$(TABLES)/frontier/$(1)/$(m) $(SWEEP_OK)$(newline))
endef
frontier: $(DEPS)
	$(foreach d,$(domain_list),$(call frontier_domain,$(d))$(newline))
	$(RUN) rm -rf $(TABLES)/frontier/report
	$(RUN) $(KUDA) report \
	  report.runs=[$(subst $(space),$(comma),$(foreach d,$(domain_list),$(TABLES)/domains/$(d)/runs $(TABLES)/frontier/$(d)))] \
	  report.frontier=true report.columns=[$(subst $(space),$(comma),$(strip $(DOMAIN_COLUMNS)))] \
	  hydra.run.dir=$(TABLES)/frontier/report

# Is the knowledge gone? KUDA, RMU, NPO and GA at their defaults on each of DOMAINS (the
# traces of table-domains), every attack on every unlearned model (docs/robustness.md): an
# attacked model is scored on the forget figures alone, relearning at 10 and 30 steps with lr
# 3e-5: at the published 1e-5 the embedded model does not relearn even the half it trains on,
# at 1e-4 relearning lowers the starting model's other half (docs/robustness.md). About 12
# minutes a run on 2 CPU cores. Table and PNGs: $(TABLES)/robustness/report/robustness.md.
ROBUST_METHODS ?= kuda,rmu,npo,ga
ATTACKS ?= relearn,relearn_general,quant8,quant4,logit_lens,fewshot
ROBUST_ARGS ?= eval.attack_figures=forget eval.facts.all_prompts=false \
  eval.facts.retain_greedy=false 'eval.attack.relearn.steps=[10,30]' \
  'eval.attack.relearn_general.steps=[30]' eval.attack.relearn.lr=3e-5 \
  eval.attack.relearn_general.lr=3e-5
ROBUST_COLUMNS := summary.forget_removed summary.perplexity_ratio \
  facts.retain.other_subjects.mc_acc train.seconds
define robust_domain
$(call trace_domain,$(1))
$(RUN) $(KUDA) unlearn -m unlearn=$(ROBUST_METHODS) locate.from_run=$(TABLES)/domains/$(1)/trace/0 \
  'eval.attacks=[$(ATTACKS)]' $(ROBUST_ARGS) $(call domain_args,$(1)) $(ARGS) \
  hydra.sweep.dir=$(TABLES)/robustness/$(1) $(SWEEP_OK)
endef
table-robustness: $(DEPS)
	$(foreach d,$(domain_list),$(call robust_domain,$(d))$(newline))
	$(RUN) rm -rf $(TABLES)/robustness/report
	$(RUN) $(KUDA) report report.runs=[$(subst $(space),$(comma),$(foreach d,$(domain_list),$(TABLES)/robustness/$(d)))] \
	  report.robustness=true report.columns=[$(subst $(space),$(comma),$(strip $(ROBUST_COLUMNS)))] \
	  hydra.run.dir=$(TABLES)/robustness/report

# KUDA's ablations on the same trace, one multirun (conf/experiment/ablate_*.yaml): relaxed vs
# hard vs no projection, the gradient projected instead of the update, fixed early and late
# layers instead of the traced ones. The table: $(TABLES)/ablation/report/report.md.
ABLATIONS ?= relaxed,hard,none,grad,early,late
ablation-kuda: $(DEPS)
	$(RUN) $(KUDA) trace -m $(ARGS) hydra.sweep.dir=$(TABLES)/facts/trace
	$(RUN) $(KUDA) unlearn -m experiment=ablate_$(subst $(comma),$(comma)ablate_,$(ABLATIONS)) \
	  locate.from_run=$(TABLES)/facts/trace/0 $(ARGS) hydra.sweep.dir=$(TABLES)/ablation/runs \
	  $(SWEEP_OK)
	$(RUN) rm -rf $(TABLES)/ablation/report
	$(RUN) $(KUDA) report report.runs=[$(TABLES)/ablation/runs] \
	  report.columns=[$(subst $(space),$(comma),$(strip $(FACTS_COLUMNS)))] \
	  hydra.run.dir=$(TABLES)/ablation/report

# zephyr-7b-beta on WMDP-bio, WMDP-cyber and MMLU: the starting model, RMU, NPO, SimNPO, GA and
# KUDA. Needs a GPU and the hub (or local copies in ARGS): checked first, one line, exit 2.
# RMU and KUDA train three down_proj matrices: one GPU each (predicted peak 1.27-1.28x the bf16 weights,
# `python scripts/bench_unlearn.py --shape zephyr-7b --plan`). The full-parameter baselines
# (FULL_BASELINES: every parameter trains) run sharded with FSDP2 over GPUS GPUs, one launch per
# domain and method (a multi-process run has a fixed directory; a completed one is skipped).
# FULL_LAUNCH=lora trains LoRA adapters on one GPU instead of sharding.
GPUS ?= 4
FULL_BASELINES ?= npo simnpo ga
WMDP_DATA ?= wmdp_bio wmdp_cyber
FULL_LAUNCH ?= fsdp2
LAUNCH_FSDP2 := $(BIN)/accelerate launch --config_file scripts/accelerate/fsdp2.yaml \
  --num_processes $(GPUS) -m kuda_cli.cli
ECHO := $(if $(DRY),echo,)
table-wmdp: $(DEPS)
	$(RUN) $(KUDA) eval -m experiment=table_wmdp $(ARGS) hydra.sweep.dir=$(TABLES)/wmdp/start
	$(RUN) $(KUDA) unlearn -m experiment=table_wmdp data=$(subst $(space),$(comma),$(WMDP_DATA)) \
	  unlearn=rmu_zephyr $(ARGS) hydra.sweep.dir=$(TABLES)/wmdp/rmu $(SWEEP_OK)
	$(if $(DRY),@,)for d in $(WMDP_DATA); do for m in $(FULL_BASELINES); do \
	  dir=$(TABLES)/wmdp/baselines/$$d-$$m; \
	  if grep -qs '"status": "completed"' $$dir/meta.json; then continue; fi; \
	  $(if $(filter lora,$(FULL_LAUNCH)), \
	    $(ECHO) $(KUDA) unlearn experiment=table_wmdp data=$$d unlearn=$$m \
	      unlearn.lora.enabled=true $(ARGS) hydra.run.dir=$$dir, \
	    $(ECHO) $(LAUNCH_FSDP2) unlearn experiment=table_wmdp data=$$d unlearn=$$m \
	      unlearn.trainable=[all] $(ARGS) hydra.run.dir=$$dir) \
	    || [ $$? -eq 1 ]; \
	done; done
	$(RUN) $(KUDA) unlearn -m experiment=table_wmdp data=$(subst $(space),$(comma),$(WMDP_DATA)) \
	  unlearn=kuda locate=causal_tracing $(ARGS) hydra.sweep.dir=$(TABLES)/wmdp/kuda $(SWEEP_OK)
	$(RUN) rm -rf $(TABLES)/wmdp/report
	$(RUN) $(KUDA) report report.runs=[$(TABLES)/wmdp] report.metric_prefix=lm_eval \
	  hydra.run.dir=$(TABLES)/wmdp/report

# MUSE News (the Llama-2-7B target) and Books (the ICLM-7B target): VerbMem, KnowMem forget and
# retain, PrivLeak. The retrained models are evaluated too: their PrivLeak AUC is the reference
# (pass it back as NEWS_RETRAIN_AUC=... BOOKS_RETRAIN_AUC=...).
NEWS_RETRAIN_AUC ?= null
BOOKS_RETRAIN_AUC ?= null
MUSE_NEWS := experiment=table_muse data.retrain_auc=$(NEWS_RETRAIN_AUC)
MUSE_BOOKS := experiment=table_muse model=muse-books-iclm-7b data=muse_books \
  data.retrain_auc=$(BOOKS_RETRAIN_AUC)
table-muse: $(DEPS)
	$(RUN) $(KUDA) eval -m $(MUSE_NEWS) $(ARGS) hydra.sweep.dir=$(TABLES)/muse/news/start
	$(RUN) $(KUDA) eval -m $(MUSE_BOOKS) $(ARGS) hydra.sweep.dir=$(TABLES)/muse/books/start
	$(RUN) $(KUDA) eval -m experiment=table_muse model=muse-bench/MUSE-News_retrain \
	  model.tokenizer=meta-llama/Llama-2-7b-hf $(ARGS) \
	  hydra.sweep.dir=$(TABLES)/muse/news/retrain $(SWEEP_OK)
	$(RUN) $(KUDA) eval -m experiment=table_muse model=muse-bench/MUSE-Books_retrain \
	  model.tokenizer=meta-llama/Llama-2-7b-hf data=muse_books $(ARGS) \
	  hydra.sweep.dir=$(TABLES)/muse/books/retrain $(SWEEP_OK)
	$(RUN) $(KUDA) unlearn -m $(MUSE_NEWS) unlearn=$(BASELINES) $(ARGS) \
	  hydra.sweep.dir=$(TABLES)/muse/news/baselines $(SWEEP_OK)
	$(RUN) $(KUDA) unlearn -m $(MUSE_NEWS) unlearn=kuda locate=causal_tracing $(ARGS) \
	  hydra.sweep.dir=$(TABLES)/muse/news/kuda $(SWEEP_OK)
	$(RUN) $(KUDA) unlearn -m $(MUSE_BOOKS) unlearn=$(BASELINES) $(ARGS) \
	  hydra.sweep.dir=$(TABLES)/muse/books/baselines $(SWEEP_OK)
	$(RUN) $(KUDA) unlearn -m $(MUSE_BOOKS) unlearn=kuda locate=causal_tracing $(ARGS) \
	  hydra.sweep.dir=$(TABLES)/muse/books/kuda $(SWEEP_OK)
	$(RUN) rm -rf $(TABLES)/muse/report
	$(RUN) $(KUDA) report report.runs=[$(TABLES)/muse/news,$(TABLES)/muse/books] \
	  report.metric_prefix=muse hydra.run.dir=$(TABLES)/muse/report

# TOFU forget10 on open-unlearning's Llama-3.2-1B target: forget probability, ROUGE and truth
# ratio, forget quality, model utility, membership attacks. The retain90 model is evaluated
# first: its forget truth ratios, read back from its metrics.json, are forget quality's reference.
TOFU_RETAIN := $(TABLES)/tofu/retain90
TOFU_RATIOS := $(if $(DRY),'data.retain_truth_ratios=[tofu.forget.truth_ratios of $(TOFU_RETAIN)]',\
  "$$($(BIN)/python scripts/tofu_retain_ratios.py $(TOFU_RETAIN))")
table-tofu: $(DEPS)
	$(RUN) $(KUDA) eval experiment=table_tofu model=tofu-llama3.2-1b-retain90 $(ARGS) \
	  hydra.run.dir=$(TOFU_RETAIN)
	$(RUN) $(KUDA) eval -m experiment=table_tofu $(TOFU_RATIOS) $(ARGS) \
	  hydra.sweep.dir=$(TABLES)/tofu/start
	$(RUN) $(KUDA) unlearn -m experiment=table_tofu $(TOFU_RATIOS) unlearn=$(BASELINES) $(ARGS) \
	  hydra.sweep.dir=$(TABLES)/tofu/baselines $(SWEEP_OK)
	$(RUN) $(KUDA) unlearn -m experiment=table_tofu $(TOFU_RATIOS) unlearn=kuda \
	  locate=causal_tracing $(ARGS) hydra.sweep.dir=$(TABLES)/tofu/kuda $(SWEEP_OK)
	$(RUN) rm -rf $(TABLES)/tofu/report
	$(RUN) $(KUDA) report report.runs=[$(TABLES)/tofu] report.metric_prefix=tofu \
	  hydra.run.dir=$(TABLES)/tofu/report

# Two-stage tuning of KUDA (docs/scale.md): trace once; stage 1 sweeps tau and lr and picks the
# largest change keeping utility within 3%; stage 2 sweeps beta from that choice and picks again.
# ARGS go to every command (model=..., data=...), PICK to the pickers (tune.utility=...).
TUNE ?= outputs/tune
PICK ?=
tune: tune-stage1 tune-stage2

tune-stage1: $(DEPS)
	$(RUN) $(KUDA) trace -m $(ARGS) hydra.sweep.dir=$(TUNE)/trace
	$(RUN) $(KUDA) unlearn -m experiment=tune_stage1 locate.from_run=$(TUNE)/trace/0 $(ARGS) \
	  hydra.sweep.dir=$(TUNE)/stage1 $(SWEEP_OK)
	$(RUN) rm -rf $(TUNE)/pick1
	$(RUN) $(KUDA) pick tune.runs=[$(TUNE)/stage1] $(PICK) hydra.run.dir=$(TUNE)/pick1

tune-stage2: $(DEPS)
	$(RUN) $(KUDA) unlearn -m experiment=tune_stage2 tune.choice=$(TUNE)/pick1/choice.yaml \
	  locate.from_run=$(TUNE)/trace/0 $(ARGS) hydra.sweep.dir=$(TUNE)/stage2 $(SWEEP_OK)
	$(RUN) rm -rf $(TUNE)/pick2
	$(RUN) $(KUDA) pick tune.runs=[$(TUNE)/stage2] \
	  tune.carry=[unlearn.lr,unlearn.nullspace.tau,unlearn.beta] $(PICK) hydra.run.dir=$(TUNE)/pick2

# Step time and peak memory of KUDA, RMU and full fine-tuning side by side (docs/benchmarks.md).
# GPU, 7B shapes: make bench-unlearn BENCH='--shape zephyr-7b --device cuda'
BENCH ?= --model embedded
bench-unlearn: $(DEPS)
	$(RUN) $(BIN)/python scripts/bench_unlearn.py $(BENCH)
