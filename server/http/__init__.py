"""HTTP plumbing every router uses: dependencies, auth, errors, request context, small routers."""
