// The demo page's one identity per tab, shared by the chat, the board and the shared document:
// - with anonymous auth, a guest key kept in sessionStorage (one per tab, kept across reloads) goes on
//   every connection (`?guest=`), so the server makes them one guest (docs/configuration.md);
// - with a JWT (`?token=`), the token already names the user;
// - the chat connection's welcome names the user; `whenIdentity()` hands it to the other sections;
// - each user gets a colour from a fixed palette of well-separated hues.

const params = new URLSearchParams(location.search);
export const token = params.get("token") || undefined;

/** This tab's guest key: 24 random bytes, base64url (32 characters of [A-Za-z0-9_-]). */
function guestKey() {
  const stored = sessionStorage.getItem("wirehub.guest");
  if (stored && /^[A-Za-z0-9_-]{16,128}$/.test(stored)) return stored;
  const bytes = crypto.getRandomValues(new Uint8Array(24));
  const key = btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  sessionStorage.setItem("wirehub.guest", key);
  return key;
}

/** The URL of an endpoint for this tab: with the guest key unless a token names the user. */
export function endpoint(/** @type {string} */ path) {
  return token ? path : `${path}${path.includes("?") ? "&" : "?"}guest=${encodeURIComponent(guestKey())}`;
}

/** @typedef {{user: string, name: string, colour: string}} Identity */

/** @type {Identity | null} */
let current = null;
/** @type {Array<(id: Identity) => void>} */
const waiting = [];

/** Set by the chat on its welcome (again after a reconnect: the same user with a key or a token). */
export function setIdentity(/** @type {{user: string, name?: string}} */ welcome) {
  current = { user: welcome.user, name: welcome.name || welcome.user, colour: colour(welcome.user) };
  for (const fn of waiting.splice(0)) fn(current);
  return current;
}

/** @returns {Promise<Identity>} */
export function whenIdentity() {
  return current ? Promise.resolve(current) : new Promise((resolve) => waiting.push(resolve));
}

/** Twelve hues at least ΔE 29 (CIE76) apart from each other, readable on white. */
export const PALETTE = Object.freeze([
  "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#0099cc",
  "#f032e6", "#9a6324", "#800000", "#469990", "#000075", "#808000",
]);

/** A user's slot in the palette by a hash of the user: the same in every tab. */
export function paletteSlot(/** @type {string} */ user) {
  let h = 2166136261; // FNV-1a
  for (let i = 0; i < user.length; i++) h = Math.imul(h ^ user.charCodeAt(i), 16777619) >>> 0;
  return h % PALETTE.length;
}

/** @type {Map<string, number>} the slot each user got on this page */
const given = new Map();

/**
 * A user's colour on this page: its hash slot, unless another user here already has that colour,
 * then the next free one, so two people seen together never share a colour (up to 12 people). The
 * tab's own user is asked first, so it keeps its hash colour, the one the other tabs usually show.
 */
export function colour(/** @type {string} */ user) {
  let slot = given.get(user);
  if (slot === undefined) {
    const taken = new Set(given.values());
    slot = paletteSlot(user);
    for (let i = 0; i < PALETTE.length && taken.has(slot); i++) slot = (slot + 1) % PALETTE.length;
    given.set(user, slot);
  }
  return PALETTE[slot];
}
