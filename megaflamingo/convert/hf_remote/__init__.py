"""Source files copied into every exported Hugging Face directory (`trust_remote_code`).

They import only torch and transformers (never megaflamingo, open_clip or open_flamingo), so an
exported directory loads on a machine that has neither installed.
"""
