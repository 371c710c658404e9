"""A tiny Hugging Face job (a model built from a config: no download). argv: save_dir mode,
mode "trainer" (Trainer + ProvMLCallback) or "accelerate" (an Accelerate loop with ProvMLTracker)."""

import sys

import torch

import prov4ml_dist as prov4ml


def tiny_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=16))


def samples(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (n, 8), generator=g)]


def trainer_job(save_dir: str) -> None:
    from transformers import Trainer, TrainingArguments

    from prov4ml_dist.integrations.hf import ProvMLCallback

    args = TrainingArguments(output_dir=save_dir + "/out", max_steps=4, per_device_train_batch_size=2,
                             per_device_eval_batch_size=2, logging_steps=1, save_steps=2, eval_strategy="steps",
                             eval_steps=2, report_to=[], use_cpu=True, disable_tqdm=True, learning_rate=1e-3,
                             save_strategy="steps", dataloader_num_workers=0)
    trainer = Trainer(model=tiny_model(), args=args, train_dataset=samples(16), eval_dataset=samples(4),
                      callbacks=[ProvMLCallback()])
    trainer.train()


def accelerate_job() -> None:
    from accelerate import Accelerator

    from prov4ml_dist.integrations.accelerate_tracker import ProvMLTracker

    tracker = ProvMLTracker()
    accelerator = Accelerator(cpu=True, log_with=[tracker])
    accelerator.init_trackers("hf", config={"lr": 1e-3, "batch": 2})
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    data = torch.utils.data.DataLoader(samples(16), batch_size=2)
    model, optimizer, data = accelerator.prepare(model, optimizer, data)
    for step, batch in enumerate(data):
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        accelerator.log({"loss": loss.item()}, step=step)  # Accelerate: main process only
        tracker.log({"rank_loss": loss.item()}, step=step)  # the tracker itself: every rank
        if step == 3:
            break
    accelerator.end_training()


def main() -> None:
    save_dir, mode = sys.argv[1], sys.argv[2]
    prov4ml.start_run("hf", provenance_save_dir=save_dir, sample_interval=None, merge_timeout=60)
    trainer_job(save_dir) if mode == "trainer" else accelerate_job()
    prov4ml.end_run()


if __name__ == "__main__":
    main()
