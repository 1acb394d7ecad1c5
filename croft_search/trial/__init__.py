"""The trial layer: one configuration of one method trained from cached features by the
shared loop (`loop`), evaluated under the trial's protocol (`evaluate`), run by
`runner.run_trial`. It imports the core and the methods (`trainables`), never the search."""
