/* bench/graph.py's instance: ready by sd_notify DELAY seconds after its process started.
 *
 * A C program, so that what the benchmark measures is the supervisor and not the start-up of
 * a hundred interpreters on two cores. It prints the time it sent READY=1, then waits for a
 * signal. Built by bench/graph.py with the machine's cc into a temporary folder.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <stddef.h>
#include <unistd.h>

int main(int argc, char **argv) {
    double delay = argc > 1 ? atof(argv[1]) : 0.1;
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    struct timespec wait = {(time_t)delay, (long)((delay - (time_t)delay) * 1e9)};
    nanosleep(&wait, NULL);

    const char *path = getenv("NOTIFY_SOCKET");
    if (!path || !*path) return 2;
    struct sockaddr_un address = {.sun_family = AF_UNIX};
    size_t length = strlen(path);
    if (length >= sizeof(address.sun_path)) return 2;
    memcpy(address.sun_path, path, length);
    if (address.sun_path[0] == '@') address.sun_path[0] = '\0';
    int sock = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    if (sendto(sock, "READY=1", 7, 0, (struct sockaddr *)&address,
               (socklen_t)(offsetof(struct sockaddr_un, sun_path) + length)) < 0)
        return 3;
    printf("ready-sent %ld.%09ld\n", (long)now.tv_sec, now.tv_nsec);
    fflush(stdout);
    for (;;) pause();
}
