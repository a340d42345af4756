"""Code shared by every pdserve process.

Torch-free modules (config, protocol, block hashing, KV events, tokenizer, chat
templates, OpenAI API shapes) sit apart from the torch ones (models, engine,
attention) so the router can import this package without torch.
"""
