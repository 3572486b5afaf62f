// Type-checked by `npm test` (tsc, strict) against the published declarations (types/*.d.ts, through the
// package's "exports"): what a TypeScript user writes compiles, and misuse does not.
import WirehubClientDefault, {
  CloseCode, GameRoom, Subscription, WirehubClient, WirehubError, applyPatch, closePolicy,
  type ClientOptions, type JoinInfo, type Member, type MessageFrame,
} from "wirehub-client";

const options: ClientOptions = { token: async () => "t", backoffMin: 100, pingInterval: 0 };
const client: WirehubClient = new WirehubClientDefault("ws://127.0.0.1:8080/ws/chat", options);

export async function usage(): Promise<void> {
  await client.connect();
  const sub: Subscription = await client.join("lobby", (msg: MessageFrame) => msg.data, {
    onJoined: (info: JoinInfo) => info.recovered,
  });
  const position: { offset: number; epoch: string } | null = sub.position;
  const ack: { offset: number } = await client.publish("lobby", { text: "hi" });
  const members: Member[] = await client.presence("lobby");
  const page = await client.history("lobby", { limit: 10, since: position ?? undefined });
  const texts: MessageFrame[] = page.messages;
  const game: GameRoom = await client.joinGame("board", (state, info) => info.version);
  const { version }: { version: number } = await game.update([{ op: "add", path: "/a", value: 1 }]);
  const off: () => void = client.on("status", (s) => s);
  off();
  const err = new WirehubError("timeout", "no reply");
  const code: string = err.code;
  const next = closePolicy(CloseCode.GOING_AWAY, "retry_ms=5", 0, { backoffMin: 1, backoffMax: 2 });
  const delay: number = next.delay;
  applyPatch({}, [{ op: "add", path: "/x", value: 1 }]);
  // @ts-expect-error: a room is a string
  await client.join(42, () => {});
  // @ts-expect-error: publish takes a room first
  await client.publish({ text: "hi" });
  void [ack, members, texts, version, code, delay];
}
