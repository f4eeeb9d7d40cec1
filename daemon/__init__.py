"""eplbd: the EPLB agent that lives in every inference worker, and its launcher."""
