"""Evaluate the three tiny tasks of one backbone family on 1 or 2 CPU processes and print their metrics
as JSON (rank 0).

Run as a script (DDP re-executes this command per rank): python ddp_eval_script.py DEVICES WORKDIR FAMILY
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from task_fixtures import (FAMILIES, caption_loaders, make_tokenizer, retrieval_loaders,  # noqa: E402
                           trainer_kwargs, vqa_loaders)


def main(devices: int, workdir: str, family: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    tokenizer = make_tokenizer(workdir)
    out = {}
    # 5 images / 10 questions: with 2 processes the sampler pads (an image seen twice).
    tasks = [
        ("retrieval", {"k_test": 4, "itm_batch_size": 3}, retrieval_loaders(tokenizer, n_images=5, eval_batch_size=1)[1]),
        ("captioning", {"max_generated_length": 9}, caption_loaders(tokenizer, n_images=5, batch_size=1)[1]),
        ("vqa", {"k_test": 4}, vqa_loaders(tokenizer, n_images=5, batch_size=1)[1]),
    ]
    for name, extra, loader in tasks:
        pl.seed_everything(0)
        module = FAMILIES[family].module(name, tokenizer, output_dir=os.path.join(workdir, f"{devices}"), **extra)
        trainer = pl.Trainer(**trainer_kwargs(workdir, devices=devices, strategy="ddp" if devices > 1 else "auto"))
        trainer.validate(module, loader)
        out[name] = module.eval_results["val"]
        if name != "retrieval":
            out[name + "_file"] = json.loads(module.results_paths["val"].read_text()) if trainer.is_global_zero else None
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print("RESULT:" + json.dumps(out, sort_keys=True), flush=True)
    # Tear gloo down before the interpreter exits: left to exit-time destructors, a rank sometimes
    # aborts ("terminate called without an active exception") after all the work is done.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
