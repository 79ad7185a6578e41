"""A site's privacy: its policy, its ledger, the mechanisms it releases through, its egress log.

- :mod:`client.privacy.policy`      what the site allows (set on site only)
- :mod:`client.privacy.ledger`      every release composed into one (epsilon, delta), never reset
- :mod:`client.privacy.mechanisms`  the Gaussian mechanisms for statistics a site releases
- :mod:`client.privacy.egress`      the egress contract (what a reply may hold) and the egress log
- :mod:`client.privacy.facade`      :class:`~client.privacy.facade.SitePrivacy`: the one way a
                                    handler plans, checks, charges, seeds and logs a release
"""
