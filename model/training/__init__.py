"""Tools that train the model's learned parts or write its presets: the fast level's outer loop
(`outer_loop`) and trainer (`trainer`), and the anchor-text writer (`anchor_text`). Their command
lines are `nsam train-memory` and `nsam anchor-text` (server/cli.py). Serving never imports them."""
