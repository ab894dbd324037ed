"""The training loop of uptraining (conversion/uptrain.py) and pretraining from scratch (conversion/pretrain.py): one
`transformers.Trainer` path for both.

- `options`: the data and Trainer options, and the checks that refuse bad ones before any work;
- `data`: the tokenizer, the training text cut into blocks, the evaluation text;
- `trainer`: `UptrainTrainer` (loss terms, distillation, depth-aware FLOP count) and its callbacks (FLOP budget,
  capacity schedule, a staged run moved into place at its first checkpoint);
- `run`: `run_training`, which trains, saves and evaluates;
- `summary`: OUTPUT_DIR/training_summary.json and the loss curve.
"""
