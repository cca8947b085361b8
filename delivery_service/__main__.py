"""python -m delivery_service: same as livekit-mls-ds."""

from delivery_service.cli import main

main()
