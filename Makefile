# One command for the main job, one for the tests; both set up what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
PROJECT := projects/InsLocDetCo

.PHONY: setup test test-fast lint demo bench clean

setup: $(VENV)/.ready
$(VENV)/.ready: scripts/setup_env.sh setup.py
	VENV=$(VENV) bash scripts/setup_env.sh
	touch $@

test: setup
	$(PY) -m pytest -q $(PROJECT)/tests

# The edit-test loop: every test but those marked slow (processes, process groups, training runs).
test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PROJECT)/tests

lint: setup
	$(PY) -m ruff check $(PROJECT) setup.py
	$(PY) -m ruff format --check $(PROJECT) setup.py

# The main job on the embedded data: pretrain InsLoc-FPN on scikit-image's photos; read out
# what it learned next to random init (augmented-view retrieval on the generated demo_cls
# images, which pretraining never saw); convert, fine-tune Mask R-CNN R50-FPN on the generated
# demo_det set, evaluate; print both tables.
DEMO_OUT := output/demo
DEMO_CKPT := $(DEMO_OUT)/pretrain_insloc_fpn/model_final.pth
DEMO_FINETUNE := SOLVER.MAX_ITER 60 SOLVER.STEPS "(45,)" SOLVER.WARMUP_ITERS 6 \
	SOLVER.IMS_PER_BATCH 4 SOLVER.BASE_LR 0.02
demo: setup
	$(PY) $(PROJECT)/train_net.py --config-file demo/pretrain_insloc_fpn_cpu.yaml --resume \
		OUTPUT_DIR $(DEMO_OUT)/pretrain_insloc_fpn
	$(PY) $(PROJECT)/eval_readout.py views $(DEMO_CKPT) random --train demo_cls_train \
		--val demo_cls_val --precise-bn 256 --num-workers 1 --output-dir $(DEMO_OUT)/readout
	$(PY) $(PROJECT)/eval_transfer.py run $(DEMO_CKPT) \
		--benchmark demo_coco_fpn --trials 1 --output-dir $(DEMO_OUT)/transfer $(DEMO_FINETUNE)
	@echo; echo "What the pretraining learned (frozen features, BN re-estimated on 256 images):"
	@$(PY) $(PROJECT)/eval_readout.py table $(DEMO_OUT)/readout
	@echo "Views resN: % of 500 unseen images whose two augmented views are each other's nearest"
	@echo "neighbour in pooled resN features -- the invariance the pretext task trains; random"
	@echo "init sets the floor. The AP above is a plumbing check at this budget (README)."
	@echo "Everything is under $(DEMO_OUT)/: pretraining run (curves.png with the chance line),"
	@echo "readout/results.md, transfer/results.md"

bench: setup
	$(PY) $(PROJECT)/bench/bench_pretrain.py

# What `make demo`, `make bench` and the README's commands create: run outputs and the generated
# demo_det and demo_cls sets, at the root and in $(PROJECT) (where the README's commands run).
# Other data sets under datasets/ are yours: kept (the folder goes only if it is then empty).
clean:
	rm -rf output $(PROJECT)/output datasets/demo_det $(PROJECT)/datasets/demo_det \
		datasets/demo_cls $(PROJECT)/datasets/demo_cls
	rmdir datasets $(PROJECT)/datasets 2>/dev/null || true
