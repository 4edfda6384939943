"""AIM on a real model: SmolLM2-135M-Instruct experts fine-tuned here, merged with and without AIM."""
