// The JavaScript client of the rooms module's guide (seeds/001, "Client Integration"), run
// unchanged under Node against Switchboard's /ws by tests/node_client.rs. The class below is
// copied from the guide byte for byte; only the harness around it is ours: it takes the URL
// from argv, prints every frame the handlers see as one JSON line, and exits when done.
//
// WebSocket: Node's own (global from Node 22; `--experimental-websocket` on Node 20/21), or
// the `ws` package (NODE_PATH) on older Node.
if (typeof WebSocket === 'undefined') {
  globalThis.WebSocket = require('ws');
}

class WebSocketClient {
  constructor(url) {
    this.url = url;
    this.ws = null;
    this.handlers = new Map();
  }

  connect() {
    return new Promise((resolve, reject) => {
      this.ws = new WebSocket(this.url);
      
      this.ws.onopen = () => resolve(this);
      this.ws.onerror = (err) => reject(err);
      
      this.ws.onmessage = (event) => {
        const msg = JSON.parse(event.data);
        const handler = this.handlers.get(msg.type);
        if (handler) handler(msg);
      };
    });
  }

  on(type, handler) {
    this.handlers.set(type, handler);
    return this;
  }

  subscribe(room) {
    this.ws.send(JSON.stringify({ type: 'subscribe', room }));
  }

  unsubscribe(room) {
    this.ws.send(JSON.stringify({ type: 'unsubscribe', room }));
  }

  publish(room, data) {
    this.ws.send(JSON.stringify({ type: 'publish', room, data }));
  }

  broadcast(data) {
    this.ws.send(JSON.stringify({ type: 'broadcast', data }));
  }

  close() {
    this.ws.close();
  }
}

// The harness: the guide's usage (connected -> subscribe 'notifications'), then a publish to
// that room, an unsubscribe, a broadcast (refused: clients may not broadcast by default) and a
// publish to a room this client left (refused: not subscribed), each frame printed.
const url = process.argv[2];
const client = new WebSocketClient(url);
const print = (msg) => console.log(JSON.stringify(msg));
const timer = setTimeout(() => { console.error('timed out'); process.exit(2); }, 10000);
let errors = 0;

client
  .on('connected', (msg) => {
    print(msg);
    client.subscribe('notifications');
  })
  .on('subscribed', (msg) => {
    print(msg);
    client.publish('notifications', { message: 'Hello!' });
  })
  .on('message', (msg) => {
    print(msg);
    client.unsubscribe('notifications');
  })
  .on('unsubscribed', (msg) => {
    print(msg);
    client.broadcast({ message: 'to everyone' });
    client.publish('notifications', { message: 'after leaving' });
  })
  .on('error', (msg) => {
    print(msg);
    errors += 1;
    if (errors === 2) {
      clearTimeout(timer);
      client.close();
    }
  });

client.connect().catch((err) => {
  console.error('connect failed', err && err.message);
  process.exit(1);
});
