"""The reward network's parts: the network (`network`), its training set and quality
statistics (`quality`), its rows of the evaluation table (`rows`). The experiment
itself is `experiments.reward_net`."""
