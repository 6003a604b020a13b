"""``python -m deltamoe`` (used by ``accelerate launch -m deltamoe train CONFIG.yaml``)."""

from deltamoe.cli import main

main()
