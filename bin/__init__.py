"""muscle's command-line tools, installed as ``muscle.cli`` (console scripts muscle-*)."""
