"""The playground: a web page, served by the service, to try, compare and manage adapters."""
