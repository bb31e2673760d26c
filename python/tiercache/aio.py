class AsyncTierCache:  # filled in by the next commit
    pass


class AsyncLease:
    pass
