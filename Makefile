# One command for the main job, one for the tests; both set up what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
PROJECT := projects/InsLocDetCo

.PHONY: setup test lint demo bench clean

setup: $(VENV)/.ready
$(VENV)/.ready: scripts/setup_env.sh setup.py
	VENV=$(VENV) bash scripts/setup_env.sh
	touch $@

test: setup
	$(PY) -m pytest -q $(PROJECT)/tests

lint: setup
	$(PY) -m ruff check $(PROJECT) setup.py

# The main job on the embedded data: pretrain InsLoc-FPN on scikit-image's photos, convert,
# fine-tune Mask R-CNN R50-FPN on the generated demo_det set, evaluate, print the AP table.
DEMO_OUT := output/demo
DEMO_FINETUNE := SOLVER.MAX_ITER 60 SOLVER.STEPS "(45,)" SOLVER.WARMUP_ITERS 6 \
	SOLVER.IMS_PER_BATCH 4 SOLVER.BASE_LR 0.02
demo: setup
	$(PY) $(PROJECT)/train_net.py --config-file demo/pretrain_insloc_fpn_cpu.yaml --resume \
		OUTPUT_DIR $(DEMO_OUT)/pretrain_insloc_fpn
	$(PY) $(PROJECT)/eval_transfer.py run $(DEMO_OUT)/pretrain_insloc_fpn/model_final.pth \
		--benchmark demo_coco_fpn --trials 1 --output-dir $(DEMO_OUT)/transfer $(DEMO_FINETUNE)
	@echo "Everything is under $(DEMO_OUT)/: pretraining run (curves.png), transfer/results.md"

bench: setup
	$(PY) $(PROJECT)/bench/bench_pretrain.py

# What `make demo`, `make bench` and the README's commands create: run outputs and the generated
# demo_det set, at the root and in $(PROJECT) (where the README's commands run). Other data sets
# under datasets/ are yours: kept (the folder goes only if it is then empty).
clean:
	rm -rf output $(PROJECT)/output datasets/demo_det $(PROJECT)/datasets/demo_det
	rmdir datasets $(PROJECT)/datasets 2>/dev/null || true
