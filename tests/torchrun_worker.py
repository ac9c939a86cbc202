"""Run under torchrun (two nodes of one process): a TP=2 model's logits, saved to argv[1]."""
import sys

import torch


def compute(group):
    from shardwise.layers import gather_logits
    from shardwise.models.config import LlamaConfig
    from shardwise.models.llama import LlamaForCausalLM
    from shardwise.shards import init_weights
    cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg, group=group)
    init_weights(model, seed=11)
    ids = torch.arange(20).view(2, 10) % 97
    with torch.no_grad():
        return gather_logits(model(ids), model.lm_head)


if __name__ == "__main__":
    from shardwise import Mesh
    mesh = Mesh.init(tp=2)
    torch.save(compute(mesh.tp_group), sys.argv[1])
