#!/usr/bin/env bash
# A scripted afternoon in the real app: a real X server (Xvfb), a window manager (openbox), real keys
# (xdotool), the real engine on the demo model. Screenshots go to OUT for a person to look at.
#   apt-get install xvfb openbox xdotool imagemagick     # and Qt's xcb libraries (libxcb-cursor0 ...)
#   bash scripts/app_session.sh [OUT]
set -euo pipefail
OUT=${1:-app-session}
mkdir -p "$OUT"
DATA=$(mktemp -d)
export DISPLAY=:97 MLX_CREPULSE_APP_DIR="$DATA" XDG_CONFIG_HOME="$DATA/config"  # no preferences of yours touched
Xvfb :97 -screen 0 1280x860x24 >/dev/null 2>&1 & XVFB=$!
trap 'kill $XVFB 2>/dev/null; rm -rf "$DATA"' EXIT
sleep 1
openbox >/dev/null 2>&1 &
sleep 1
shot() { sleep "${2:-1}"; import -window root "$OUT/$1.png"; echo "$OUT/$1.png"; }
start() { python -m desktop >"$OUT/app.log" 2>&1 & sleep 7; xdotool windowactivate --sync "$(xdotool search --name '^mlx-crepulse$' | head -1)"; }

start
xdotool key ctrl+a; xdotool type --delay 20 "a red circle"; xdotool key ctrl+Return
shot 1-batch 12
xdotool key s Right s                       # star two: the keys go to the grid, not the prompt
shot 2-starred
# (the coordinates below are for this 1280x860 screen and the window's default layout)
xdotool mousemove 650 300; shot 2b-hover-bar 1            # the bar on the tile under the pointer
xdotool mousemove 631 428; shot 2c-hover-tooltip 2        # its "vary strongly" button says what it does
xdotool mousemove 170 323 click --repeat 3 1; xdotool type "16"   # a batch of 16, long enough to queue behind
xdotool mousemove 170 150 click 1; xdotool key ctrl+a; xdotool type --delay 10 "a blue square"; xdotool key ctrl+Return
xdotool key ctrl+a; xdotool type --delay 10 "a green triangle"; xdotool key ctrl+Return
shot 2d-queued 1                                          # the second waits, and says so
sleep 14; xdotool mousemove 170 323 click --repeat 3 1; xdotool type "4"
xdotool mousemove 277 95 click 1; shot 2e-recent-prompts 1; xdotool key Escape
xdotool mousemove 650 300 click 1; xdotool key s Right s  # back to the grid; two stars, to blend below
xdotool key Return; shot 3-full-view 2; xdotool key Escape
xdotool key Return; shot 4-full-view-again 2; xdotool key Escape
xdotool key c Left c; shot 5-compare 2; xdotool key Escape
xdotool key ctrl+1; shot 6-vary-subtly 14
xdotool key ctrl+b; shot 7-blend-dialog 2; xdotool key Return; shot 8-blend-row 25
xdotool key ctrl+e; shot 9-explore 14
xdotool key ctrl+0; shot 10-diversity-off 14
xdotool key ctrl+Tab; shot 11-history 2
xdotool key ctrl+q; sleep 2
start; shot 12-relaunched 1                 # stars and history survive the restart
xdotool key ctrl+q
