"""`python -m server`: until the HTTP server lands, an offline generation on the default model."""

from server.offline_demo import main

if __name__ == "__main__":
    main()
