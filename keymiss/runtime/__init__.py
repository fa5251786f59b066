"""What both front ends use, written once below them: loading an app, the network checks, exit
statuses, the event loop they run on and the metrics they share. Nothing here knows a front end."""
